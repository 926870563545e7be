"""The `bitsearch` command line: the library's commands (cli.library), the kernels' (cli.kernels) and a client
of a bitsearch server (cli.client). The library never imports this package."""
