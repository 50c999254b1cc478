"""cei-actors: the Common Execution Infrastructure as event-sourced actors."""
