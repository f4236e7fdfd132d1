"""The production rules: pure functions over facts and time, no I/O (import-linter checks that
nothing here imports the views, the processes, a database or a network client)."""
