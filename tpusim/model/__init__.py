"""What a user describes: the workload YAML (and MaxText configs), and how its mesh maps onto the chips."""
