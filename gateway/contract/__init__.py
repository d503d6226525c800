"""The gateway's contract in the ecosystem's terms: the OpenAPI document, generated from
the code that defines the routes (the configuration's campaigns, the edge's fixed
paths, the admin API's route table) and the problem codes, so that it cannot drift."""
