"""User-facing errors.

Every problem caused by the user's input (a bad path, a truncated file, an unsupported option) raises
:class:`LoraJaxError` with a message that names the offending file/key and what was expected. The CLI
prints such errors as one line on stderr and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class LoraJaxError(Exception):
  """An error caused by user input, with a message meant to be read by a person."""
