// Classifies one candidate crop with a TorchScript classifier exported by `lungcad export`.
//
//   lungcad-classify MODEL.ts CROP.raw
//
// CROP.raw: 32x48x48 little-endian float32 HU in (index, row, col) order, as
// `numpy.ndarray.tofile` writes it. HU are clipped to [-1000, 1000] as in training.
// Prints "p_not_nodule p_nodule" (the model's softmax over its two classes) on one line.
#include <torch/script.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <vector>

namespace {

constexpr int64_t kIndex = 32, kRows = 48, kCols = 48;
constexpr int64_t kVoxels = kIndex * kRows * kCols;

// The crop's voxels, or an empty vector (after saying why) if the file is not one crop.
std::vector<float> read_crop(const char* path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) {
    std::cerr << path << ": cannot open\n";
    return {};
  }
  const std::streamsize bytes = file.tellg();
  if (bytes != kVoxels * static_cast<std::streamsize>(sizeof(float))) {
    std::cerr << path << ": " << bytes << " bytes, expected " << kVoxels * sizeof(float)
              << " (32x48x48 float32)\n";
    return {};
  }
  std::vector<float> voxels(kVoxels);
  file.seekg(0);
  file.read(reinterpret_cast<char*>(voxels.data()), bytes);
  return voxels;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: " << argv[0] << " MODEL.ts CROP.raw\n";
    return 2;
  }
  std::vector<float> voxels = read_crop(argv[2]);
  if (voxels.empty()) return 2;

  torch::jit::script::Module model;
  try {
    model = torch::jit::load(argv[1]);
  } catch (const c10::Error& error) {
    std::cerr << argv[1] << ": cannot load as TorchScript: " << error.what_without_backtrace()
              << "\n";
    return 2;
  }
  model.eval();
  torch::NoGradGuard no_grad;

  // (32, 48, 48) -> (N=1, C=1, 32, 48, 48), clipped like lungcad.data.crops.clip_hu.
  torch::Tensor crop = torch::from_blob(voxels.data(), {1, 1, kIndex, kRows, kCols}, torch::kFloat32)
                           .clamp(-1000.0, 1000.0);
  // The classifier returns (logits, probabilities), each (1, 2).
  const auto outputs = model.forward({crop}).toTuple();
  const torch::Tensor probabilities = outputs->elements()[1].toTensor();
  std::printf("%.9g %.9g\n", probabilities[0][0].item<float>(), probabilities[0][1].item<float>());
  return 0;
}
