"""AIThriving Structure nodes for ComfyUI. Importing this module does nothing but define the entry point."""


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension listing this pack's nodes."""
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class AIThrivingExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return AIThrivingExtension()
