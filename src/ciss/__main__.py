from ciss.cli import main

main()
