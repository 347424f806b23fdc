"""AIThriving Structure nodes for ComfyUI. Importing this module does nothing but define the entry point."""

# ComfyUI serves this folder at /extensions/<pack folder>/: the cost display and set-up (JS) and the help
# page.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: adds the pack's routes (key status and entry, offline mode), puts the
    templates' picture into the input folder, lists its nodes."""
    import folder_paths
    from comfy_api.latest import ComfyExtension
    from server import PromptServer

    from .nodes import NODES, provide_example_input
    from .server_routes import register_routes

    provide_example_input(folder_paths.get_input_directory())

    # ComfyUI calls this while loading custom nodes, after PromptServer exists and before it adds
    # its route table to the web app, which is when a pack's routes must be in the table.
    if PromptServer.instance is not None:
        register_routes(PromptServer.instance.routes)

    class AIThrivingExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return AIThrivingExtension()
