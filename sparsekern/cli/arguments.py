"""Argument types for the commands: a bad value is an argparse error (exit status 2) naming it."""
import argparse


def _number(text, convert, valid, expected):
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text):
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def density(text):
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def positive_float(text):
    return _number(text, float, lambda v: v > 0, "a positive number")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None: the help says)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)
