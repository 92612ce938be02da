import bpy
settings = bpy.context.scene.t2vz

settings.mode = 'text2video'
settings.steps = 50
settings.guidance = 7.5
settings.motion = [12.0, 12.0]
settings.append_to_prompt('high quality, HD, 8K, trending on artstation, high focus, dramatic lighting')
