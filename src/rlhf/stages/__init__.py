"""Pipeline stages: each reads files, writes runs/<name>/<stage>/, and exposes run(config) and main(argv)."""
