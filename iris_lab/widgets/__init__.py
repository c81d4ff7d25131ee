"""Interactive panels (ipywidgets + matplotlib) used by the notebooks."""
