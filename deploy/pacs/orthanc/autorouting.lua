-- pacs-ai auto-routing rule for Orthanc (Lua; Orthanc 1.5 or later, tested with 1.10.1
-- by tests/e2e/test_orthanc_routing.py).
--
-- Every CT instance Orthanc stores is sent to pacs-ai by C-STORE, whether it came from a
-- modality (DICOM), the REST API or a plugin. What pacs-ai sends back (its SR, key images,
-- KOS and SEG, with Modality SR / OT / KO / SEG) is never routed again: routing only CT is
-- the first guard, and anything stored by pacs-ai's AE title or by a Lua script is the
-- second, so a CT that pacs-ai might one day return cannot loop either.
--
-- Install (deploy/pacs/orthanc.md): "LuaScripts": ["/etc/orthanc/pacs-ai-autorouting.lua"]
-- and the "pacsai" entry of pacs-ai-modality.json in "DicomModalities".

local PACS_AI_MODALITY = 'pacsai'   -- the symbolic name of pacs-ai in DicomModalities
local PACS_AI_AET = 'PACS_AI'       -- pacs-ai's node.ae_title: the calling AE of its deliveries
local ROUTED_MODALITIES = { CT = true }   -- Modality (0008,0060) values sent to pacs-ai

local function trim(value)
   if value == nil then
      return ''
   end
   return (string.gsub(tostring(value), '^%s*(.-)%s*$', '%1'))
end

-- origin (Orthanc's DicomInstanceOrigin): RequestOrigin is 'DicomProtocol' (with RemoteIp,
-- RemoteAet, CalledAet), 'RestApi' (RemoteIp, Username), 'Lua', 'Plugins' or 'WebDav'.
-- tags: the instance's tags in Orthanc's simplified JSON (keyword -> value).
function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin ~= nil then
      if origin['RequestOrigin'] == 'Lua' then
         return
      end
      if origin['RequestOrigin'] == 'DicomProtocol' and trim(origin['RemoteAet']) == PACS_AI_AET then
         return
      end
   end
   if not ROUTED_MODALITIES[trim(tags['Modality'])] then
      return
   end
   -- Queued in Orthanc's Lua job: instances stored in a row share one association, which
   -- stays open DicomAssociationCloseDelay seconds (default 5) after the last one.
   SendToModality(instanceId, PACS_AI_MODALITY)
end
