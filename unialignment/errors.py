"""The one kind of error a user fixes rather than reports: a mistake in what they gave us.

A config key, a component folder, a data file, a command-line option: every such mistake is raised as a
`UserError` whose message names the key, file or line and says what to change. The entry points (`scripts/train.py`,
`train_unialignment.sh`, `inference.py`, the export and cache scripts) print it once, as one line, and exit with
status 2; anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's config, folders, files or options; the message says where and what to change."""
