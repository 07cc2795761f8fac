from components.register.main import main

main()
