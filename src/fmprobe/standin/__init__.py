"""Stand-ins for what a real study has and this machine does not: tiny random models of each backbone family
(saved as the real ones are, so the real loading code runs) and copies of a recipe's YAML files pointing at them."""
