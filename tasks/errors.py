"""The one error type for bad user input. Every layer raises it with the file, field and value in the message; the
CLIs turn it into one line on stderr and exit code 2."""


class InputError(ValueError):
    pass
