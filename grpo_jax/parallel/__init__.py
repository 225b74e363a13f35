"""The device mesh and how arrays are laid out on it: logical axis rules and placement
(partitioning), rows across hosts (multihost), and reading compiled programs (compiled)."""
