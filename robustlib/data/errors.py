"""The single exception type raised for every data problem."""

from robustlib.checks import InputError


class DataError(InputError):
  """A data set could not be found, fetched, verified or parsed.

    The message always says what is wrong and what to do about it: which files
    to put in which directory, which checksum was expected, which byte of which
    file is malformed, or which names are valid.
    """
