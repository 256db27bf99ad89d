from hybridprune.cli.main import main

main()
