"""Read models derived from stored events: shift calendar, machine timeline, ISO 22400 OEE.

The modules here are pure logic over time intervals (no I/O), so every OEE rule is testable with
hand-computed examples; they import nothing of ours but ``contracts``."""
