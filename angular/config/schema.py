"""The JSON schema of params.yaml, which editors check the file with (``python -m angular.config
--schema > params.schema.json``)."""

import json

from pydantic.json_schema import GenerateJsonSchema

from angular.config.params import Params

SCHEMA_FILE = "params.schema.json"


class _Schema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema) -> bool:
        return False  # "title": "Epochs" next to "epochs" says nothing


def params_schema() -> str:
    """The JSON schema of params.yaml (``params.schema.json``), as text."""
    schema = Params.model_json_schema(schema_generator=_Schema)
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
    return json.dumps(schema, indent=2) + "\n"
