import bpy
settings = bpy.context.scene.t2vz

settings.steps = 20
settings.guidance = 9.0
settings.use_look_words('best quality, extremely detailed')
settings.use_look_negative('longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, worst quality, low quality')
