import bpy
settings = bpy.context.scene.t2vz

settings.steps = 30
settings.guidance = 5.0
settings.use_look_words('')
settings.use_look_negative('')
