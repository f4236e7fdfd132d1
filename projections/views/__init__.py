"""Read models that keep tables: the runner that feeds them from the event log, where they live
(SQLite or PostgreSQL), and the views themselves. They may use the rules, never the processes."""
