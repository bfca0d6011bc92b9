"""The single exception type raised for every data problem."""


class DataError(ValueError):
  """A data set could not be found, fetched, verified or parsed.

    The message always says what is wrong and what to do about it: which files
    to put in which directory, which checksum was expected, which byte of which
    file is malformed, or which names are valid.
    """
