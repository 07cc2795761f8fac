from components.deploy.main import main

main()
