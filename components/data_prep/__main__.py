from components.data_prep.main import main

main()
