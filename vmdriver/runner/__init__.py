"""The pod runner face (VM-Operator style): one supervised VM from a YAML config."""
