"""Scene-control tests: a package, so its conftest is not the add-on tests' ``conftest``."""
