import bpy
settings = bpy.context.scene.t2vz

settings.steps = 50
settings.size_mode = 'NATIVE'
settings.write_mp4 = True
