"""Options, specs and markers: what the user typed, as typed values, parsed once."""
