"""Everything that speaks to BuildKit: channels, session, solves, progress, containers."""
