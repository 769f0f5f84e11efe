"""The regap-export command line (Typer), a thin layer over the ``regap_export`` library."""
