from tierfleet.cli import main

main()
