"""AIThriving Structure nodes for ComfyUI. Importing this module does nothing but define the entry point."""

# ComfyUI serves this folder at /extensions/<pack folder>/: the cost display (JS) and the help page (docs/).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing this pack's nodes."""
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class AIThrivingExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return AIThrivingExtension()
