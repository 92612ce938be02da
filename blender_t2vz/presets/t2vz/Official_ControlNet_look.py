import bpy
settings = bpy.context.scene.t2vz

settings.mode = 'controlnet'
settings.steps = 20
settings.guidance = 9.0
settings.append_to_prompt('best quality, extremely detailed')
settings.fill_negative_prompt('longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality')
