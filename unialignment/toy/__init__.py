"""The built-in small default: tiny real components (T5, teacher, transformer) built locally, so that
every code path runs on any machine without downloading weights."""
