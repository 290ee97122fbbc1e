from fedscan.cli import main

main()
