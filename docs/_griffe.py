"""griffe extension for the API reference: an `__init__` that Python or Equinox wrote
(no docstring of its own) inherits `object.__init__`'s "Initialize self. ..."; drop
it, so a class shows its own docstring only."""

import griffe


class DropInheritedInitDocstrings(griffe.Extension):
    def on_function_instance(self, *, func: griffe.Function, **kwargs) -> None:
        doc = func.docstring
        if func.name == "__init__" and doc and doc.value.startswith("Initialize self."):
            func.docstring = None
