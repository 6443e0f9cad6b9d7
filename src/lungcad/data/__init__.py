"""CT I/O, patient/voxel geometry, LUNA16 tables, the series split, the volume cache
and synthetic phantoms."""
