from lungcad.cli import main

main()
