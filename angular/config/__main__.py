"""``python -m angular.config --schema > params.schema.json``: write the JSON schema."""

import sys

from angular.config.schema import params_schema

if sys.argv[1:] != ["--schema"]:
    sys.exit("usage: python -m angular.config --schema > params.schema.json")
sys.stdout.write(params_schema())
