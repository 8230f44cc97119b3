"""The passes, one module each. Importing a module registers its pass (``effcompile.pass_manager.register``)."""
