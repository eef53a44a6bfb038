from ztune.cli import main

main()
