"""The HTTP front door (`tierfleet serve`): jobs for services in any language, with
bearer tokens mapped to teams. `producers.api.app.create_app` builds the ASGI app."""
