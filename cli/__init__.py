"""The `pod` command (`cli.main`): the core's CLI machinery (`pod.cli`) with every stage's subcommands."""
