from components import exiting

exiting.run("components.data_prep.main")
