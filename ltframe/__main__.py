from ltframe.cli import main

main()
