import bpy
settings = bpy.context.scene.t2vz

settings.steps = 20
settings.size_mode = 'PREVIEW'
settings.write_mp4 = False
