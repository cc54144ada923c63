"""How foreign errors are named inside ours (`focal_jax._messages.first_line`), on hand-made errors."""

from focal_jax._messages import first_line


def _chained() -> ValueError:
  try:
    try:
      raise OSError("Error reading kernel/0.0 in file x: disk gone\n  more detail")
    except OSError as root:
      raise ValueError("restore failed for slices [0:3]\nspec: {...}") from root
  except ValueError as error:
    return error


def test_the_root_cause_is_named_by_its_first_line():
  assert first_line(_chained()) == "Error reading kernel/0.0 in file x: disk gone"
  assert first_line(_chained(), kind=True) == "OSError: Error reading kernel/0.0 in file x: disk gone"


def test_a_key_errors_quotes_are_dropped():
  assert first_line(KeyError("Unknown split 'test'")) == "Unknown split 'test'"


def test_an_empty_message_gives_the_class_name():
  assert first_line(RuntimeError("")) == "RuntimeError"
  assert first_line(RuntimeError("  \n"), kind=True) == "RuntimeError"
