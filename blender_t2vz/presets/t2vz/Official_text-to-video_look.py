import bpy
settings = bpy.context.scene.t2vz

settings.use_look_words('high quality, HD, 8K, trending on artstation, high focus, dramatic lighting')
settings.use_look_negative('')
