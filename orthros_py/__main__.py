from orthros_py.cli import main

main()
