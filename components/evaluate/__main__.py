from components.evaluate.main import main

main()
